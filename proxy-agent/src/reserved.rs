//! Ports the kernel must never hand out by itself in a network namespace
//! (`net.ipv4.ip_local_reserved_ports`, which covers IPv6 too): veil's listener ports.
//!
//! The bind guard refuses an explicit bind to them, but `listen()` on an unbound socket and
//! `bind()` to port 0 take a port no bind hook sees; a sandbox could loop on those while the
//! agent restarts until it lands on another sandbox's listener port. A reserved port is never
//! picked that way. The setting belongs to the netns, so it holds while the agent is down; only
//! the ports the agent adds or removes are touched, anything else listed stays.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

const SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
/// Serialises the read-modify-write of the sysctl between agents (one per host in production,
/// many at once in tests).
const LOCK: &str = "/run/veil-reserved-ports.lock";

/// The ports of a `ip_local_reserved_ports` value (`"8080,9000-9010"`); malformed items are
/// an error, so a value we do not understand is never rewritten.
pub fn parse(text: &str) -> Result<BTreeSet<u16>, String> {
    let mut ports = BTreeSet::new();
    for item in text
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
    {
        let port = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| format!("bad port {s:?}"))
        };
        match item.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(format!("bad range {item:?}"));
                }
                ports.extend(lo..=hi);
            }
            None => {
                ports.insert(port(item)?);
            }
        }
    }
    Ok(ports)
}

/// The `ip_local_reserved_ports` value of `ports`, consecutive ports as ranges.
pub fn render(ports: &BTreeSet<u16>) -> String {
    let mut items: Vec<String> = Vec::new();
    let mut iter = ports.iter().copied().peekable();
    while let Some(lo) = iter.next() {
        let mut hi = lo;
        while iter.peek() == Some(&(hi.wrapping_add(1))) && hi != u16::MAX {
            hi += 1;
            iter.next();
        }
        items.push(if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}-{hi}")
        });
    }
    items.join(",")
}

/// Adds `add` to and removes `remove` from the reserved ports of `netns` (the agent's own when
/// `None`). Port 0 is ignored.
pub fn update(netns: Option<&Path>, add: &[u16], remove: &[u16]) -> io::Result<()> {
    let add: Vec<u16> = add.iter().copied().filter(|&p| p != 0).collect();
    let remove: Vec<u16> = remove
        .iter()
        .copied()
        .filter(|&p| p != 0 && !add.contains(&p))
        .collect();
    if add.is_empty() && remove.is_empty() {
        return Ok(());
    }
    let _lock = lock()?;
    // The sysctl answers for the netns of the thread that opens it.
    crate::sockets::in_netns(netns, move || {
        let current = std::fs::read_to_string(SYSCTL)?;
        let mut ports = parse(&current).map_err(io::Error::other)?;
        let before = ports.clone();
        ports.extend(&add);
        for p in &remove {
            ports.remove(p);
        }
        if ports != before {
            // A zero-length write is ignored: an empty list must still end in a newline.
            std::fs::write(SYSCTL, format!("{}\n", render(&ports)))?;
        }
        Ok(())
    })
}

fn lock() -> io::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(LOCK)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io::Error::from(e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests may unwrap")]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_what_the_kernel_prints() {
        assert_eq!(parse("").unwrap(), BTreeSet::new());
        assert_eq!(parse("\n").unwrap(), BTreeSet::new());
        assert_eq!(
            parse("8080,9000-9002\n").unwrap(),
            [8080, 9000, 9001, 9002].into()
        );
        for bad in ["x", "1-", "5-3", "70000", "1,,2-a"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn renders_ranges() {
        assert_eq!(
            render(&[1, 2, 3, 5, 65534, 65535].into()),
            "1-3,5,65534-65535"
        );
        assert_eq!(render(&BTreeSet::new()), "");
    }

    proptest! {
        #[test]
        fn round_trips(ports in prop::collection::btree_set(any::<u16>(), 0..64)) {
            prop_assert_eq!(parse(&render(&ports)).unwrap(), ports);
        }
    }
}
