//! Egress rules of `egress: "host"` sandboxes: which destinations the agent refuses to open
//! from the host's network namespace on a sandbox's behalf. Pure code, no sockets.
//!
//! A sandbox whose only way out is veil must not reach through veil what the host can reach
//! but the internet cannot: the host itself (loopback, its own addresses), link-local
//! neighbours (the cloud metadata service at 169.254.169.254), private networks. The built-in
//! list ([`BUILTIN_DENY`]) always applies; `egress_deny` adds ranges to it and `egress_allow`
//! punches holes in both (allow wins), so a configuration can never drop a built-in range by
//! accident. An IPv4-mapped IPv6 destination (`::ffff:a.b.c.d`) is judged as its IPv4
//! address: it reaches the same host.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// Ranges refused by default, with why (shown in refusals and in the docs).
pub const BUILTIN_DENY: &[(&str, &str)] = &[
    ("0.0.0.0/8", "unspecified (this host)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    (
        "100.64.0.0/10",
        "shared address space (RFC 6598; some clouds' metadata)",
    ),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("::/128", "unspecified (this host)"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated private)"),
    ("fc00::/7", "unique local (private)"),
    ("ff00::/8", "multicast"),
];

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// One of the host's own addresses.
    HostAddress,
    /// Inside a built-in range.
    Builtin(IpNet, &'static str),
    /// Inside a range of `egress_deny`.
    Configured(IpNet),
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::HostAddress => f.write_str("an address of the host"),
            Denied::Builtin(net, why) => write!(f, "{why} range {net}"),
            Denied::Configured(net) => write!(f, "egress_deny range {net}"),
        }
    }
}

/// What the rules say about one destination address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// May be opened from the host.
    Allowed,
    /// Refused.
    Denied(Denied),
}

/// The deny and allow lists of `egress: "host"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRules {
    builtin: Vec<(IpNet, &'static str)>,
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
}

impl Default for EgressRules {
    fn default() -> Self {
        Self::new(Vec::new(), Vec::new())
    }
}

impl EgressRules {
    /// The built-in list plus `deny`, with `allow` winning over both.
    pub fn new(deny: Vec<IpNet>, allow: Vec<IpNet>) -> Self {
        let builtin = BUILTIN_DENY
            .iter()
            .filter_map(|(net, why)| net.parse().ok().map(|n| (n, *why)))
            .collect();
        Self {
            builtin,
            deny: deny.into_iter().map(|n| n.trunc()).collect(),
            allow: allow.into_iter().map(|n| n.trunc()).collect(),
        }
    }

    /// The verdict for `ip`; `is_host` tells whether an address is one of the host's own (it
    /// is asked the canonical form: IPv4 for an IPv4-mapped address).
    pub fn verdict(&self, ip: IpAddr, is_host: impl Fn(IpAddr) -> bool) -> Verdict {
        let ip = ip.to_canonical();
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return Verdict::Allowed;
        }
        if is_host(ip) {
            return Verdict::Denied(Denied::HostAddress);
        }
        if let Some((net, why)) = self.builtin.iter().find(|(n, _)| n.contains(&ip)) {
            return Verdict::Denied(Denied::Builtin(*net, why));
        }
        match self.deny.iter().find(|n| n.contains(&ip)) {
            Some(net) => Verdict::Denied(Denied::Configured(*net)),
            None => Verdict::Allowed,
        }
    }
}

/// Parses one `egress_deny` / `egress_allow` entry: a CIDR (`10.0.0.0/8`, `fd00::/8`) or a
/// single address (a /32 or /128). IPv4-mapped IPv6 networks are refused: write the IPv4 form.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err(format!(
                    "{text:?} is not an IP network (write a CIDR such as 10.0.0.0/8 or fd00::/8, \
                     or one address)"
                ));
            }
        },
    };
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && v6.network().to_ipv4_mapped().is_some()
    {
        return Err(format!(
            "{text:?} is an IPv4-mapped IPv6 network: write it as IPv4 (mapped destinations are \
             judged as their IPv4 address)"
        ));
    }
    Ok(net.trunc())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn no_host(_: IpAddr) -> bool {
        false
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn builtin_ranges_parse() {
        assert_eq!(EgressRules::default().builtin.len(), BUILTIN_DENY.len());
    }

    #[test]
    fn refuses_what_only_the_host_reaches() {
        let r = EgressRules::default();
        for s in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "169.254.169.254",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.100.100.200",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "fc00::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
        ] {
            assert!(
                matches!(r.verdict(ip(s), no_host), Verdict::Denied(_)),
                "{s} allowed"
            );
        }
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "172.15.255.255",
            "192.169.0.1",
            "198.18.0.2",
            "100.128.0.1",
            "2001:db8::1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert_eq!(r.verdict(ip(s), no_host), Verdict::Allowed, "{s} refused");
        }
    }

    #[test]
    fn reasons_name_the_range() {
        let r = EgressRules::new(vec![net("198.18.0.0/15")], vec![]);
        assert_eq!(
            r.verdict(ip("169.254.169.254"), no_host),
            Verdict::Denied(Denied::Builtin(
                net("169.254.0.0/16"),
                "link-local (cloud metadata)"
            ))
        );
        assert_eq!(
            r.verdict(ip("198.18.0.1"), no_host),
            Verdict::Denied(Denied::Configured(net("198.18.0.0/15")))
        );
        let text = Denied::Builtin(net("10.0.0.0/8"), "private (RFC 1918)").to_string();
        assert_eq!(text, "private (RFC 1918) range 10.0.0.0/8");
    }

    #[test]
    fn host_addresses_are_refused_unless_allowed() {
        let host: BTreeSet<IpAddr> = [ip("198.18.0.1"), ip("2001:db8::5")].into();
        let is_host = |a: IpAddr| host.contains(&a);
        let r = EgressRules::default();
        assert_eq!(
            r.verdict(ip("198.18.0.1"), is_host),
            Verdict::Denied(Denied::HostAddress)
        );
        assert_eq!(
            r.verdict(ip("::ffff:198.18.0.1"), is_host),
            Verdict::Denied(Denied::HostAddress)
        );
        assert_eq!(r.verdict(ip("198.18.0.2"), is_host), Verdict::Allowed);
        let open = EgressRules::new(vec![], vec![net("198.18.0.0/30")]);
        assert_eq!(open.verdict(ip("198.18.0.1"), is_host), Verdict::Allowed);
    }

    #[test]
    fn allow_wins_over_builtin_and_configured_deny() {
        let r = EgressRules::new(
            vec![net("203.0.113.0/24")],
            vec![net("10.1.0.0/16"), net("203.0.113.7/32")],
        );
        assert_eq!(r.verdict(ip("10.1.2.3"), no_host), Verdict::Allowed);
        assert!(matches!(
            r.verdict(ip("10.2.0.1"), no_host),
            Verdict::Denied(_)
        ));
        assert_eq!(r.verdict(ip("203.0.113.7"), no_host), Verdict::Allowed);
        assert!(matches!(
            r.verdict(ip("203.0.113.8"), no_host),
            Verdict::Denied(Denied::Configured(_))
        ));
    }

    #[test]
    fn parses_cidrs_and_single_addresses() {
        assert_eq!(parse_net("10.0.0.0/8").unwrap(), net("10.0.0.0/8"));
        assert_eq!(parse_net("10.1.2.3/8").unwrap(), net("10.0.0.0/8"));
        assert_eq!(parse_net("192.0.2.7").unwrap(), net("192.0.2.7/32"));
        assert_eq!(parse_net("fd00::/8").unwrap(), net("fd00::/8"));
        assert_eq!(parse_net("2001:db8::1").unwrap(), net("2001:db8::1/128"));
        for bad in [
            "",
            "10.0.0.0/33",
            "fd00::/129",
            "host",
            "10.0.0",
            "::ffff:10.0.0.0/104",
        ] {
            let e = parse_net(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    fn any_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, p)| IpNet::new(
                IpAddr::V4(Ipv4Addr::from(a)),
                p
            )
            .unwrap()
            .trunc()),
            (any::<u128>(), 0u8..=128).prop_map(|(a, p)| IpNet::new(
                IpAddr::V6(Ipv6Addr::from(a)),
                p
            )
            .unwrap()
            .trunc()),
        ]
    }

    fn any_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        ]
    }

    /// An address inside built-in range `i`.
    fn builtin_member(i: usize, bits: u128) -> IpAddr {
        let n: IpNet = BUILTIN_DENY[i].0.parse().unwrap();
        match n {
            IpNet::V4(n) => {
                let host = (bits as u32) & !u32::from(n.netmask());
                IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
            }
            IpNet::V6(n) => {
                let host = bits & !u128::from(n.netmask());
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
            }
        }
    }

    proptest! {
        #[test]
        fn mapped_addresses_are_judged_as_ipv4(
            a in any::<u32>(),
            deny in prop::collection::vec(any_net(), 0..4),
            allow in prop::collection::vec(any_net(), 0..4),
            host in prop::collection::btree_set(any::<u32>(), 0..4),
        ) {
            let r = EgressRules::new(deny, allow);
            let is_host = |ip: IpAddr| matches!(ip, IpAddr::V4(v4) if host.contains(&u32::from(v4)));
            let v4 = Ipv4Addr::from(a);
            prop_assert_eq!(
                r.verdict(IpAddr::V6(v4.to_ipv6_mapped()), is_host),
                r.verdict(IpAddr::V4(v4), is_host)
            );
        }

        #[test]
        fn allow_always_wins(
            ip in any_ip(),
            deny in prop::collection::vec(any_net(), 0..4),
            prefix in 0u8..=32,
            host in any::<bool>(),
        ) {
            let canonical = ip.to_canonical();
            let prefix = if canonical.is_ipv4() { prefix } else { prefix * 4 };
            let allow = IpNet::new(canonical, prefix).unwrap().trunc();
            let r = EgressRules::new(deny, vec![allow]);
            prop_assert_eq!(r.verdict(ip, |_| host), Verdict::Allowed);
        }

        #[test]
        fn every_builtin_range_is_refused_without_allow(
            i in 0..BUILTIN_DENY.len(),
            bits in any::<u128>(),
            deny in prop::collection::vec(any_net(), 0..4),
        ) {
            let ip = builtin_member(i, bits);
            let r = EgressRules::new(deny, vec![]);
            prop_assert!(matches!(r.verdict(ip, no_host), Verdict::Denied(_)), "{} allowed", ip);
        }

        #[test]
        fn host_addresses_are_refused_without_allow(ip in any_ip()) {
            let r = EgressRules::default();
            let canonical = ip.to_canonical();
            prop_assert!(matches!(
                r.verdict(ip, |a| a == canonical),
                Verdict::Denied(_)
            ));
        }

        #[test]
        fn outside_every_range_is_allowed(ip in any_ip()) {
            let canonical = ip.to_canonical();
            let listed = BUILTIN_DENY
                .iter()
                .any(|(n, _)| n.parse::<IpNet>().unwrap().contains(&canonical));
            let r = EgressRules::default();
            prop_assert_eq!(r.verdict(ip, no_host) == Verdict::Allowed, !listed);
        }
    }
}
