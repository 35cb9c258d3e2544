//! The addresses of the host the agent runs on (its own network namespace's interfaces).
//!
//! Used where "the host" must be named by address: veil's own listeners bound to an unspecified
//! address are guarded on every host address, and `egress: "host"` sandboxes may not reach them.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;

/// Every address configured on an interface of the agent's network namespace, loopback included.
pub fn host_addresses() -> io::Result<BTreeSet<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter_map(|ifa| ifa.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_a_host_address() {
        let addrs = host_addresses().unwrap();
        assert!(addrs.contains(&IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
    }
}
